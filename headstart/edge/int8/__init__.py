"""Full-integer int8 conversion: channel equalization, rounding, range measurement."""
