from apiproxy.cli import main

raise SystemExit(main())
