"""Expert demonstration datasets: collection over placement grids (`collect`), storage (`dataset`), videos."""
