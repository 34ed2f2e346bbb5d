from tidal_compile.calibration import main

main()
