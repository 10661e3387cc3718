"""Credentials: signed bearer tokens and the interceptor that checks them on every RPC."""
