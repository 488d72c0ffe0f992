from saepipe.cli import main

raise SystemExit(main())
