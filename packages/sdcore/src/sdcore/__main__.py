"""``python -m sdcore`` (used by ``accelerate launch -m sdcore train ...``)."""

from .cli import main

if __name__ == "__main__":
    main()
