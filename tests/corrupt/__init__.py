"""A corpus of bad inputs, generated on the fly (no binaries are committed).

``corpus.CORPUS`` lists every bad input with the command that reads it and what mriseg must
do with it; ``harness`` runs the CLI in a subprocess and checks the outcome (exit code, one
error line naming the file, no traceback, nothing outside the output folder touched).
"""
