# The ADC's linearisation at boot (ADC boards only): calibration points
# cached in flash, else measured from the chip's eFuse calibration and
# cached. Needed once, while the board is built: firmware/boot.py unloads
# this module afterwards, so its code leaves the heap.


def lut(hal, fsroot):
    """The converter's per-chip linearisation table: from calibration
    points cached in flash (adc_cal.bin), else measured now from the
    chip's eFuse calibration (hal.adc_calibration(): read_uv against the
    raw code while the mains wave sweeps the voltage input) and cached.
    None (an ideal converter, the reading flagged uncalibrated) when
    neither is possible, e.g. no mains at the first boot: the next boot
    tries again. Returns (table or None, "flash", "efuse" or None)."""
    from array import array
    path = fsroot.rstrip("/") + "/adc_cal.bin"
    pts = None
    src = None
    try:
        with open(path, "rb") as f:
            raw = array("i", f.read())
        if len(raw) >= 4 and not len(raw) % 2:
            pts = [(raw[i], raw[i + 1]) for i in range(0, len(raw), 2)]
            for i in range(1, len(pts)):
                # a damaged cache: codes and voltages must both rise
                if not (0 <= pts[i - 1][0] < pts[i][0] <= 4095 and pts[i - 1][1] <= pts[i][1]):
                    pts = None
                    break
            if pts:
                src = "flash"
    except (OSError, ValueError):
        pts = None
    if pts is None:
        try:
            pts = hal.adc_calibration()
        except (ValueError, OSError):
            pts = None
        if pts:
            src = "efuse"
            try:
                raw = array("i", bytes(8 * len(pts)))
                for i in range(len(pts)):
                    raw[2 * i] = pts[i][0]
                    raw[2 * i + 1] = pts[i][1]
                with open(path + ".new", "wb") as f:
                    f.write(raw)
                import os
                os.rename(path + ".new", path)
            except OSError:
                pass        # used now, measured again at the next boot
    if not pts:
        return None, None
    from firmware.metering import lut_from_points
    return lut_from_points(pts), src
