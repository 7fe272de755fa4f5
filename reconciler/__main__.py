from .cli import main

if __name__ == "__main__":  # importing the module runs nothing (a tool that imports __main__)
    main()
