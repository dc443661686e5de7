-- The MLflow database is POSTGRES_DB; Airflow's metadata lives beside it.
CREATE DATABASE airflow;
