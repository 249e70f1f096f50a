"""Building blocks shared by experiment modules (config sections, pretrained bases, judges)."""
