"""`python -m qant_mail` runs the command line."""

from qant_mail.cli import main

main()
