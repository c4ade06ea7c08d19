"""PeXR data tools: from hospital X-rays and reports to (image, body-part text, body part) training triplets.

- `pexr.synthetic`: PeXR-mini, a synthetic pediatric X-ray set with multi-part reports, for demos and tests.
- `pexr.dicom`: `read_dicom`, one DICOM radiograph to a [0, 1] image, body part and age (`DicomError` otherwise).
- `pexr.reports`: `split_report`, one study report to the text of each imaged body part (rules or a local LLM).
- `pexr.sources`: build inputs (a manifest, or a DICOM tree plus a report table) to pseudonymised studies.
- `pexr.build`: `pexr build`, studies to a sharded, resumable parquet dataset with rejects and stats.
- `pexr.stats`: counts, text lengths, text sources and rejects of a build folder, as Markdown and a plot.
- `pexr.cli`: the `pexr` command line (`python -m pexr`): mini, build, stats, split-report.
"""
