from dmgr.synth.app import main

main()
