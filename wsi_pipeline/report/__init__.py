"""The cohort report: one self-contained HTML file (``wsi report``).

Sections appear only when their inputs exist in the RUN folder: cohort table and prediction
distributions (``predictions.csv``), performance and responder subgroups (with a labels CSV), the TME
read-out (``tme.csv``), the predictive-biomarker and tumour-evolution analyses (``RUN/analysis/``) and the
failed slides (``slides.csv``). Images are inlined as base64 PNG, CSS is inline, there is no JavaScript.
"""
