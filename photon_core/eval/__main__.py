from photon_core.eval.evaluate import main

main()
