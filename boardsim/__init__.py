"""Host-only parts of a board: simulated hardware behind the HAL (hal_sim,
hal_virtual, atm90e32_sim, sim_waveforms), a POSIX serial port for the
virtual board's RS485 (uart_posix) and the virtual board's entry point
(vboard). Runs on MicroPython and CPython; never on a board and never in a
board's bundle. May import firmware/ and protocol/; they never import it."""
