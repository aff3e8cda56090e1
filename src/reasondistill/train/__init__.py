"""Training a student: its options (hyperparameters.py), data, teachers, on-policy sampling and the trainer."""
