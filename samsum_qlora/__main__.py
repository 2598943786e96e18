from samsum_qlora.cli import main

main()
