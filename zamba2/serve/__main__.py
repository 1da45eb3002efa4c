from zamba2.serve import main

raise SystemExit(main())
