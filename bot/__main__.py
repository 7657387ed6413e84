"""`python -m bot`: the same as the `blender-chat` command."""

import sys

from bot.cli import main

sys.exit(main())
