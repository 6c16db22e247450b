"""Pictures a person looks at: overlays, GIFs, the Dice bar plot, training curves.

matplotlib is used with the non-interactive Agg backend so that everything works
on headless cluster nodes.
"""

from __future__ import annotations

# --- overlays and GIFs (predict) ---------------------------------------------

# --- evaluation plots (evaluate) ---------------------------------------------

# --- training curves (train) -------------------------------------------------

# --- benchmark timeline (benchmark) ------------------------------------------
