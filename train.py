"""Train, compress and report in the checkout: `python train.py [group=option ...] [+compress=<recipe>]`.

The app itself is `lightning_compress.app.train` (installed as the `lightning-compress` command); its recipes are
`conf/`, packaged as `lightning_compress.conf`.
"""

from lightning_compress.app.train import main

if __name__ == "__main__":
    main()
