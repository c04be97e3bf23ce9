from photon_core.train.loop import main

main()
