"""PeXR data tools: the PeXR-mini synthetic set (and, later, DICOM reading and report splitting)."""
