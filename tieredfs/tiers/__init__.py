"""Block tiers: local SSD cache, shared directory (later), S3. See base.Tier."""
