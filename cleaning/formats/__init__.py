"""Raw dataset formats and the files insightface ships.

RAW_FORMATS names every raw layout stage 1 reads (cleaning/readers.py plans and reads them,
cleaning/synthetic/demo.py writes them); the CLI's choices come from here, so listing them
costs no import of OpenCV or Dask."""

RAW_FORMATS = ("vggface2", "msceleb-tsv", "image-folder", "insightface-rec")
