from dmgr.eval.app import main

main()
