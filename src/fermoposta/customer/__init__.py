"""The customer side of ODMR: dial out, ATRN, serve the reversed session, deliver locally."""
