from samsum_qlora.commands.cli import main

if __name__ == "__main__":
    main()
