"""`python -m tidal_compile.calibrate`: the calibration command (`tidal_compile.calibration.main`).
The function is `tidal_compile.calibrate`; this package holds only the command."""
