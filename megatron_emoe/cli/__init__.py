"""Console scripts (installed by `make install` / `pip install`): thin command lines over the
training, evaluation, conversion and data packages. Each `main(argv)` returns an exit status."""
