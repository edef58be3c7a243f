"""The gate: does a candidate replace the champion (McNemar test, the decision)?"""
