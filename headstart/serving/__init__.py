"""Using a finished run: prediction on image files, evaluation on a labelled folder."""
