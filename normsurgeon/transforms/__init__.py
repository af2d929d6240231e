"""Weight transforms: primitives (fold, centre, shrink) and the recipes built from them."""
