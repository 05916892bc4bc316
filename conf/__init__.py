"""The recipes of the app (`lightning_compress.app.train`), packaged as `lightning_compress.conf`."""
