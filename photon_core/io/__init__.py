"""Reading scans (NIfTI, NRRD, DICOM) and the official Photon preparation with its Geometry."""
