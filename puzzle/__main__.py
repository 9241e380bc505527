from puzzle.cli import main

raise SystemExit(main())
