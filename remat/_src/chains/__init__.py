"""Running a chain under a plan: unrolled (execute, remat.sequential) or as nested scans (scanned).
"""
