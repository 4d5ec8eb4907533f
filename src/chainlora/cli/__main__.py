from chainlora.cli import main

raise SystemExit(main())
