"""Lightning callbacks: thin glue that calls :mod:`sq_lightning.ops`."""
