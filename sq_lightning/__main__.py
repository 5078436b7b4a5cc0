"""``python -m sq_lightning fit --config configs/<stage>.yaml``."""

from sq_lightning.cli import main

if __name__ == "__main__":
    main()
