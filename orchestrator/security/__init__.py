"""Who may do what, and what stays secret: the vault and secret references, tokens and identities, the access
policy, security events and their alerts, sealing and redaction."""
