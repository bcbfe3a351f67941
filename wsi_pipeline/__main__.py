"""`python -m wsi_pipeline ...` (also what `torchrun -m wsi_pipeline ...` runs)."""

from wsi_pipeline.cli import main

if __name__ == "__main__":
    main()
