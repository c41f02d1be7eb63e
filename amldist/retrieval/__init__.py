"""Asymmetric search for users: export the student, index a gallery with the teacher, query it."""
