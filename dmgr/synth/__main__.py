"""python -m dmgr.synth: the synthesis job (dmgr.synth.app)."""

from dmgr.cli import interrupted

try:
    from dmgr.synth.app import main
except KeyboardInterrupt:  # Ctrl-C while torch loads
    interrupted("dmgr-synth")

main()
