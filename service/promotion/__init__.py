"""Safe promotion: the rules for live thresholds and reference sets (`rules`), the gate that
judges a version before an alias serves it (`gate`), what each alias last served (`served`) and
the shadow challenger (`shadow`)."""
