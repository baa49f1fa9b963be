"""``jumpflow-fid``: FID of generated images against a reference (``jumpflow.eval.fid``).

    jumpflow-fid samples_50000x256x256x3.npz VIRTUAL_imagenet256_labeled.npz      # FID-50k
    jumpflow-fid --convert-only                  # convert and cache the Inception weights once
"""

from __future__ import annotations

import sys

from jumpflow.eval.fid import main

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
