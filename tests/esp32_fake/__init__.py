# Stand-ins for the ESP32 port's `machine`, `esp32`, `network` and `time`
# modules, just deep enough to run firmware/hal_esp32.py, firmware/net.py
# and the front ends on a PC: an ADC that samples signals of simulated time
# and takes simulated time to do it, a microsecond clock that wraps like the
# port's ticks_us, SPI that reaches simulated ATM90E32 chips through their
# chip-select pins, data partitions in RAM, a network.LAN that records what
# it was given. Plain Python that also runs under the MicroPython unix port.
#
# State lives in the modules (like the real ones); call reset() between
# tests: clock.reset(...), machine.reset(), esp32.reset(), network.reset().
