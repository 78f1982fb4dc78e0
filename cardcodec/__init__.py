"""ISO 8583 as the retrofitted UnionPay-style POS terminals speak it, and their card cryptography.

Pure code: no Twisted, no database, no logging set-up. See ../shared/spec/pos-8583.md.
"""
