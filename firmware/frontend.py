# Measurement front ends behind one interface. A front end measures every
# channel of the board and adds the energy since the last call to the
# channel registers (firmware/energy.py):
#
#   fe.update(regs) -> list of energy.Result (vrms_dv, irms_ma, p_w, s_va,
#                      pf_permille, freq_chz), one per channel, in board order
#   fe.has_vref      False: powers are apparent at the nominal voltage (the
#                    reading carries F_NO_VREF)
#
# AdcFrontEnd (firmware/metering.py) samples the ESP32 ADC (or the simulated
# one) through Meter; AtmFrontEnd (firmware/atm90e32.py) reads ATM90E32
# metering ICs, which integrate energy themselves. open_frontend() builds the
# one board.json's frontend.type names and imports only the modules that one
# needs (firmware.metering and firmware.dsp for the ADC, firmware.atm90e32
# for the chips): on a stock image their code shares the GC heap with the
# data, so a board loads the code of its own front end only.
def open_frontend(hal, board, cal=None, frames=1000, lut=None):
    """The front end of a board definition, ready to measure: "adc" (the
    default) or "atm90e32" (chips on one SPI bus, frontend.spi, one chip
    select per entry of frontend.chips; they are reset and configured here,
    so a missing or miswired chip raises ATM90E32Error at start)."""
    fe = board.get("frontend") or {}
    kind = fe.get("type", "adc")
    if kind == "adc":
        from firmware.metering import AdcFrontEnd
        return AdcFrontEnd(hal, board, cal=cal, frames=frames, lut=lut)
    if kind == "atm90e32":
        from firmware.atm90e32 import ATM90E32, AtmFrontEnd, config_from_board
        spi = hal.spi(fe["spi"])
        chips = []
        for i in range(len(fe["chips"])):
            cs = hal.pin_out(fe["chips"][i]["cs"], 1)
            chips.append(ATM90E32(spi, cs, delay_ms=hal.sleep_ms, **config_from_board(board, i)))
        atm = AtmFrontEnd(chips, board)
        atm.begin()
        return atm
    raise ValueError("board frontend.type %r: not adc or atm90e32" % (kind,))
