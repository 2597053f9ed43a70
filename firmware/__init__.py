"""The meter board's firmware: everything here goes onto a board (make
firmware bundles this folder whole, with protocol/). Measurement (the ADC or
ATM90E32 front end), energy registers, the spool, the uplink over umqtt,
outputs, RS485 inverters, the commissioning console, and the ESP32 HAL.
May import protocol/ and MicroPython's own modules; never boardsim/ or the
gateway."""
