from dmgr.cli import interrupted

try:
    from dmgr.eval.app import main
except KeyboardInterrupt:  # Ctrl-C while torch loads
    interrupted("dmgr-eval")

main()
