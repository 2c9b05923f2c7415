from hawada.cli import main

raise SystemExit(main())
