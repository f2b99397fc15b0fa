"""Airflow import errors for invalid scheduled-audit files.

dags/auto_correct_labels.py builds a DAG `audit_<name>` from every valid file in the audits
folder (configs/audits/, or ACL_AUDITS_DIR) and skips the invalid ones, so one bad file
cannot hide the other DAGs. This file makes the skipped ones visible: it raises, and the
Airflow UI lists the failure under "DAG Import Errors", naming each file and key.
"""

from __future__ import annotations

from tasks.airflow_adapter import check_audit_files

check_audit_files()
